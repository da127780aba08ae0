"""What every test session shares: the MPI launcher's settings for a test machine, where the session starts
MPI jobs (tests marked `mpi`)."""
import os

import pytest

from tests.launcher import launcher


@pytest.fixture(scope="session", autouse=True)
def mpi_launcher_settings(request):
    """Open MPI's leave to run as root and to start more ranks than cores, in this process's environment for
    the session (mpirun and flock's `launch` inherit it), unless the user set them; nothing for hydra."""
    if not any(item.get_closest_marker("mpi") for item in request.session.items):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for name, value in launcher().settings().items():
            if name not in os.environ:
                patch.setenv(name, value)
        yield
