"""The edge<->cloud contract: topics, messages, update codec, chunking. Depends on numpy only."""
