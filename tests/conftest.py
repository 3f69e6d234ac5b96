import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from hypothesis import settings

# Derandomized, so CI runs the same examples every time; explore more with
# HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", max_examples=40, deadline=None,
                          derandomize=True)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
