"""What a training run tells the person who started it: the start line, the progress bar, the time budget's plan and
the last line. Only rank 0 speaks; every other rank's :class:`Progress` is silent."""

from __future__ import annotations

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    def __init__(self, main: bool):
        self.main = main
        self._bar = None

    def say(self, line: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            tqdm.write(line)  # above the bar
        else:
            print(line)

    def begin(self, what: str, total: int | None, budget_s: float, batch: int) -> None:
        """The start line: what runs (preset, device, precision, step mode, objective, size) and for how long."""
        steps = f"{budget_s:g} s" if total is None else f"{total} steps"
        self.say(f"fastflow: {what}, {steps} of batch {batch}")

    def plan(
        self, budget_s: float, steps: int, batch: int, rate: float, probed: tuple[int, int], left_s: float
    ) -> None:
        """A time budget's first plan: ``steps`` in all at ``rate`` steps/s, measured over the ``probed`` steps."""
        self.say(
            f"time budget {budget_s:g} s: {steps} steps of batch {batch} at {rate * batch:.0f} img/s "
            f"(measured over steps {probed[0]}-{probed[1]}), ends in about {left_s:.0f} s more"
        )

    def start(self, total: int | None, initial: int) -> None:
        """The progress bar, from step ``initial`` (a resumed run) to ``total`` (None: not known yet)."""
        self._bar = tqdm(total=total, initial=initial, disable=not self.main, dynamic_ncols=True, unit="step")

    def step(self) -> None:
        self._bar.update(1)

    def retotal(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def window(self, loss: float, images_per_s: float, epoch: int) -> None:
        self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", epoch=epoch)

    def close(self) -> None:
        """End the bar, so that what follows (the last line, an error) stands on its own line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
