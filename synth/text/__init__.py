"""Dialogue text: importing SFT sets, generating dialogues with an LLM, rewriting turns into
speakable text, and the dialogue row schema that the synthesis and export stages share."""
