import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")
