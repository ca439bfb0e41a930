"""The LLM client of the synthesis stages, by concern.

* :mod:`~speechmill.synth.llm.config`: :class:`LLMConfig` (a stage's ``llm`` key) and the
  dry-run cost estimate.
* :mod:`~speechmill.synth.llm.conversation`: requests, results and one request's state
  while it is answered.
* :mod:`~speechmill.synth.llm.client`: :class:`LLMClient`, chat completions with retries,
  limits, structured output, cache and accounting.
* :mod:`~speechmill.synth.llm.batch`: the client's Batch API mode.
* :mod:`~speechmill.synth.llm.budget`: spend ledger, hard budget, rate limits and the
  errors that stop a stage.
* :mod:`~speechmill.synth.llm.cache`: the persistent response cache and file locks.
* :mod:`~speechmill.synth.llm.usage`: the usage a stage committed, for its metrics.
"""
