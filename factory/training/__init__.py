"""The student on a run's products: curriculum orders (`curriculum`), TRL SFT / DPO (`train`) and
pass@k / maj@k evaluation with the pipeline's graders (`evaluate`)."""
