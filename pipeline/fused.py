"""Fusion planning: which consecutive row-local stages run as one streamed pipeline.

The runner runs each stage to completion before the next (a barrier). A *chain* lifts
the barrier between consecutive pending stages where the later one needs only the one
before it and can start on part of its input: no sink, no source, no ``prepare()`` over
the whole input (:attr:`Stage.prepare_reads_inputs`); the earlier one is no sink and
does not rewrite its parts when it ends (``unique_output_ids``). The head of a chain may
be anything but a sink (a source, a stage with a whole-input ``prepare()``): its
upstream is complete when the chain starts. ``executor: {fuse: false}`` turns it off.

Every member still commits its own parts and rejects batch by batch through
:func:`~speechmill.pipeline.batch.run_batch`, and what a member consumes is what its
upstream *committed* (the batch's output part, read back), so the run directory is the
same as unfused: resume, ``metrics.json``, ``status`` and ``--restart-from`` keep their
meaning. How a chain runs: :func:`speechmill.pipeline.attempt.run_chain` (the members'
lives), the executor's ``run_chain`` (depth-first in this process,
:mod:`speechmill.pipeline.executors.local`; one Ray Data pipeline,
:mod:`speechmill.pipeline.executors.ray_chain`).
"""

from __future__ import annotations

from speechmill.pipeline.dag import Dag, PlannedStage
from speechmill.pipeline.store import RunStore


def joins_chain(st: PlannedStage) -> bool:
    """Whether ``st`` can start on part of its (single) upstream's outputs."""
    c = st.cls
    return (len(st.spec.needs) == 1 and not (c.is_source or c.is_sink)
            and not (c.has_prepare() and c.prepare_reads_inputs))


def feeds_chain(st: PlannedStage) -> bool:
    """Whether ``st``'s parts are final as each batch commits (a fused downstream may
    read them at once)."""
    return not (st.cls.is_sink or st.cls.unique_output_ids)


def plan_chains(dag: Dag, store: RunStore) -> dict[str, list[PlannedStage]]:
    """Chains of two or more pending stages, by the id of their head stage."""
    if not getattr(dag.spec.executor, "fuse", True):
        return {}
    chains: dict[str, list[PlannedStage]] = {}
    cur: list[PlannedStage] = []

    def close() -> None:
        if len(cur) > 1:
            chains[cur[0].id] = list(cur)

    for st in dag.stages:
        if store.is_done(st.id):
            close()
            cur = []
        elif cur and feeds_chain(cur[-1]) and joins_chain(st) and st.spec.needs == [cur[-1].id]:
            cur.append(st)
        else:
            close()
            cur = [] if st.cls.is_sink else [st]
    close()
    return chains
