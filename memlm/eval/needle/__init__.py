"""S-NIAH-1/2/3 and passkey retrieval: prompts, haystack text sources and the length x depth probe."""
