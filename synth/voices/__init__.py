"""Voices for dialogue synthesis: the ``voice_bank`` sink that collects prompt clips
(:mod:`~speechmill.synth.voices.voice_bank`), reading a bank and assigning voices to
dialogues (:mod:`~speechmill.synth.voices.bank`), and offline voice matching for preset
backends (:mod:`~speechmill.synth.voices.voice_match`)."""
