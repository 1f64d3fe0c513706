"""Experience replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

``replay``: each training minibatch is concatenated with ``batch_size`` samples drawn uniformly
from the buffer (default: as many as the minibatch has). ``post_update``: the experience's samples
are offered to the buffer, whose policy (``buffer=reservoir`` / ``class_balanced``) decides what
stays. Works in every scenario. The buffer's own state is checkpointed by the runner.
"""

from __future__ import annotations

from clrun.benchmarks import Experience, concat
from clrun.buffers import Buffer
from clrun.components import RunState


class Replay:
    def __init__(self, buffer: Buffer | None, batch_size: int | None = None):
        if buffer is None:
            raise ValueError(
                "this strategy replays samples and needs a buffer: "
                "choose buffer=reservoir or buffer=class_balanced"
            )
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size={batch_size!r} must be null or an integer ≥ 1")
        self.buffer, self.batch_size = buffer, batch_size

    def replay(self, state: RunState, batch: Experience) -> Experience:
        if len(self.buffer) == 0:
            return batch
        memory = self.buffer.sample(self.batch_size or len(batch))
        return concat([batch, memory], batch.index)

    def post_update(self, state: RunState, exp: Experience) -> None:
        self.buffer.update(exp)
