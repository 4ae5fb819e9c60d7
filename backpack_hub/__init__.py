"""Publishing Backpack GPT-2 checkpoints to the Hugging Face Hub (the machinery behind ``hub_upload.py``).

One concern per module:

* ``errors``: one exception class per cause, each with the command's exit code.
* ``checkpoint``: reading an exported folder or a trainer checkpoint (through ``backpack.loading`` and the
  checkpoint format of ``backpack.checkpoints``).
* ``card``: the model card, with a model-index of the run's measured results only.
* ``staging``: the folder that is exactly what the repo will hold.
* ``validation``: loading that folder in a fresh process with ``trust_remote_code=True`` and comparing logits.
* ``hub``: the token check, the push as one commit, and the Hub's errors as the tool's.
* ``publish``: ``push_checkpoint``, the whole publication of a checkpoint.
* ``code_update``: ``update_code``, a validated pull request with this package's model code on an existing repo.
"""

from .code_update import update_code
from .errors import HubUploadError
from .publish import push_checkpoint

__all__ = ["HubUploadError", "push_checkpoint", "update_code"]
