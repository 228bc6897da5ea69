"""`up` with a taken port: fails naming the component and the port, leaves nothing running."""
import socket

import pytest

from control.local import stack
from control.local.procs import ComponentError, managed_names


@pytest.mark.parametrize("which", ["s3", "haproxy", "onprem-1"])
def test_up_with_taken_port_names_component_and_starts_nothing(settings_factory, which):
    settings = settings_factory()
    port = {"s3": settings.s3.port, "haproxy": settings.haproxy.grpc_port,
            "onprem-1": settings.instance("onprem-1").metrics_port}[which]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ComponentError) as err:
            stack.up(settings)
    assert err.value.component == which
    assert str(port) in str(err.value)
    assert stack.running_components(settings) == []
    assert managed_names(settings.run_path) == []


def test_publish_without_repository_says_how_to_build(settings_factory, tmp_path):
    settings = settings_factory(models={"repository_dir": str(tmp_path / "nothing")})
    with pytest.raises(ComponentError, match="repo build"):
        stack.publish_models(settings)
