from tests.conftest import tiny_checkpoint, tiny_export  # noqa: F401  (shared session fixtures)
