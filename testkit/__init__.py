"""Factories and fakes shared by ``tests/`` and ``benchmarks/``.

Real-speech audio files (:mod:`testkit.audio`), synthetic multi-speaker conversations
(:mod:`testkit.conversations`), segment tables (:mod:`testkit.segments`), voice-bank inputs
(:mod:`testkit.voice_bank_data`), a tiny random SNAC codec (:mod:`testkit.snac`), a
fault-injecting HTTP server (:mod:`testkit.http_faults`) and a real local multi-node Ray
cluster (:mod:`testkit.ray_cluster`). Not part of the installed ``speechmill`` package: the
repository root must be on ``sys.path`` (pytest's ``pythonpath`` setting and the benchmark
scripts put it there). Nothing here imports ``tests``.
"""
