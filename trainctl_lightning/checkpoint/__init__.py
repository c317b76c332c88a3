"""Checkpoints: CheckpointSync (``sync.py``), resume_path (``resume.py``) and the checkpoint API (``api.py``)."""
