"""The local test bed: real components on one machine, for the demo and the tests.

Nothing in here is imported by the flow or its tasks: the flow only ever sees endpoint URLs
(``HF_ENDPOINT``, an S3 endpoint, the Docker socket, a NIM port), exactly as on a GPU fleet.
"""


class TestbedError(RuntimeError):
    """A test-bed component could not be set up (a missing package, a daemon that would not start)."""

    __test__ = False  # not a pytest test class
