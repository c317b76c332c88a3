"""The fault-injection suite (issue 11): a hostile store, failing disks and uploads, lost
replies, killed processes and skewed clocks. Each test asserts that no foreign code ran,
nothing outside the destination changed, the newest complete checkpoint is still there,
and the user got one clear line."""
