"""Checkpoints that survive a kill during the write, and a resume that skips a broken one.

``AtomicCheckpointer`` is detectron2's DetectionCheckpointer with two changes:

- ``save`` writes to a temporary file in the run folder and renames it into place, then
  rewrites ``last_checkpoint`` the same way: ``last_checkpoint`` never names a partial file.
- ``readable_checkpoint`` returns the newest checkpoint that loads: the one ``last_checkpoint``
  names, else ``model_final.pth``, else ``model_<iteration>.pth`` newest first. A truncated or
  unreadable one (disk full, a copy cut short, a bad sector) is skipped with one log line.
"""
import logging
import os
import re

from transfer.d2 import ensure_detectron2

ensure_detectron2()

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402

from pretrain.engine import save_atomic, write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_(\d+)\.pth$")


class AtomicCheckpointer(DetectionCheckpointer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._verified = {}  # path -> loaded content, read once by readable_checkpoint

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        save_atomic(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        write_text_atomic(last_filename_basename,
                          os.path.join(self.save_dir, "last_checkpoint"))

    def candidates(self):
        """Checkpoint paths to resume from, preferred first."""
        names = []
        if self.has_checkpoint():
            names.append(os.path.basename(self.get_checkpoint_file()))
        files = os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []
        if "model_final.pth" in files:
            names.append("model_final.pth")
        names += sorted((f for f in files if _PERIODIC.match(f)),
                        key=lambda f: int(_PERIODIC.match(f).group(1)), reverse=True)
        return [os.path.join(self.save_dir, n) for n in dict.fromkeys(names)]

    def readable_checkpoint(self):
        """The newest checkpoint that loads, or None; says in one line what it skipped."""
        skipped = []
        for path in self.candidates():
            if not os.path.isfile(path):
                skipped.append(f"{os.path.basename(path)} (missing)")
                continue
            try:
                self._verified = {path: super()._load_file(path)}
            except Exception as e:  # any way a file fails to load: skip it, say why
                skipped.append(f"{os.path.basename(path)} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})")
                continue
            if skipped:
                logger.warning("unreadable checkpoint(s) %s; resuming from %s instead",
                               "; ".join(skipped), os.path.basename(path))
            return path
        if skipped:
            logger.warning("no readable checkpoint in %s (%s); starting from the initial "
                           "weights", self.save_dir, "; ".join(skipped))
        return None

    def _load_file(self, filename):
        if filename in self._verified:
            return self._verified.pop(filename)
        return super()._load_file(filename)
