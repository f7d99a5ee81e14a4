"""The DWM in other frameworks' training loops: Hugging Face ``Trainer`` (``hf_trainer.DWMTrainer``)."""
