"""Process reward models (scoring and training); see issue 4."""
