"""Where shard tasks run (the distributor of the build): each unfinished task is encoded and its shard files
written under the work folder, the contract between encoding and assembly (:mod:`indexer.writer`).

:class:`LocalDistributor` runs them one after another in this process. A distributed one implements the
same ``run``: send each task (plain data, :class:`~indexer.plan.ShardTask`) to a worker that builds its own
mapper with ``make_mapper`` (loads the model there) and writes the shard to shared storage, or split the
mapper into stages as :class:`~indexer.ray_engine.RayDistributor` does (decode tasks, encoder actors, shards
written by the driver); the finished-shard check makes a rerun skip what any worker finished.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol, Sequence

from tqdm import tqdm

from .encode import Progress
from .plan import ShardTask
from .writer import Shard, is_done, write_shard

Mapper = Callable[[ShardTask, Progress], Shard]


class Distributor(Protocol):
    def run(self, tasks: Sequence[ShardTask], work: Path, make_mapper: Callable[[], Mapper]) -> None:
        """Encode every task whose shard is not finished under ``work`` and write its shard there."""


class LocalDistributor:
    """Runs the tasks in this process, in order, with a progress bar per collection. A finished shard is
    written by a writer thread while the next task runs (one write at a time; an error in it stops the run), so
    the decode processes never wait for the files."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def run(self, tasks: Sequence[ShardTask], work: Path, make_mapper: Callable[[], Mapper]) -> None:
        todo = [t for t in tasks if not is_done(work, t.collection, t.number)]
        if not todo:
            return
        mapper = make_mapper()
        total = sum(len(t.items) for t in tasks)
        unit = "img" if todo[0].collection == "images" else "cap"
        with tqdm(total=total, initial=total - sum(len(t.items) for t in todo), desc=f"index {todo[0].collection}",
                  unit=unit, disable=not self.progress or total == 0, smoothing=0.1) as bar:  # no bar for nothing
            with ThreadPoolExecutor(1, thread_name_prefix="alignsearch-shard-writer") as writer:
                writing: Future | None = None
                for task in todo:
                    shard = mapper(task, bar.update)
                    if writing is not None:
                        writing.result()  # the previous shard is on disk (or its error raised here)
                    writing = writer.submit(write_shard, work, task.collection, task.number, shard)
                if writing is not None:
                    writing.result()
