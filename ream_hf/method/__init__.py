"""The method as pure tensor math: statistics, similarity, grouping, planning, merging and surgery.

Nothing here reads or writes files or knows about the Hub; it imports only torch, scipy, `ream_hf.arch` and
`ream_hf.config`. Stages, in order: `stats` (one streaming pass of calibration tokens per layer) ->
`similarity` -> `grouping` / `planning` (which source experts form each output expert) -> `merging`
(alignment and weighted sum) -> `surgery` (the layer's modules rewritten).
"""
