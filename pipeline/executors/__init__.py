"""Executors: what runs a stage's batches.

:mod:`.base` is the interface the runner uses (:class:`~.base.Executor`); :mod:`.local`
runs batches in this process, :mod:`.ray` on Ray Data (:mod:`.ray_chain`: fused chains,
:mod:`.ray_support`: what both Ray pipelines share). Every executor runs a stage's
batches through the worker host of :mod:`.worker`.
"""
