"""Quality control of synthetic dialogues: rule-based text QC
(:mod:`~speechmill.synth.qc.text_qc`), the LLM judge (:mod:`~speechmill.synth.qc.text_judge`)
and QC of synthesized audio (:mod:`~speechmill.synth.qc.synth_qc`)."""
