"""A model module whose import raises (a user's typo at module level), for `--model` checks."""
raise RuntimeError("this module is broken at import")
