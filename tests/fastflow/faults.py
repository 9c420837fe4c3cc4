"""Fault points inside ``fastflow.checkpoint.save_checkpoint``, in the order a save reaches them.

``fastflow.io.fault(point, step)`` is called at each; the tests kill a save at one of them
(test_checkpoint: in process; test_resume: the real command line) and check that nothing is lost.
"""

SAVE_POINTS = [
    "ckpt.begin",
    "ckpt.previous.linked",
    "ckpt.previous.swapping",
    "ckpt.previous.done",
    *(
        f"ckpt.{name}{end}"
        for name in ("model.safetensors", "ema.safetensors", "config.json", "state.pt")
        for end in (".tmp", "")
    ),
    "ckpt.manifest.json.tmp",
    "ckpt.manifest.json",
]
