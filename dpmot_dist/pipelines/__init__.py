"""The batch jobs: prepare → fit → sample, each a typed config and one function.

:func:`~dpmot_dist.pipelines.prepare.run_prepare` forward-diffuses a data set into sharded
Parquet targets (Ray tasks); :func:`~dpmot_dist.pipelines.fit.run_fit` fits the potential h
over Ray shard actors (:mod:`~dpmot_dist.pipelines.shards`); and
:func:`~dpmot_dist.pipelines.sample.run_sample` maps noise through the OT map
(:mod:`~dpmot_dist.pipelines.ot_map`) and refines it on Ray workers
(:mod:`~dpmot_dist.pipelines.chunks`). The CLI, ``jobs/`` and the demo call these functions.
"""

from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample
from dpmot_dist.pipelines.shards import ShardPool

__all__ = [
    "FitConfig",
    "PrepareConfig",
    "SampleConfig",
    "ShardPool",
    "run_fit",
    "run_prepare",
    "run_sample",
]
