"""``shpeft serve``: many diagnostic tasks on one shared backbone, over HTTP.

The deployment SH-PEFT is for: one pretrained backbone in memory per distinct base, and every
task kept as its delta (kilobytes to megabytes) instead of one full model per task.

- :mod:`~shpeft.serve.registry` loads runs, groups them by the base hash each delta records,
  builds each base once and gives every task a view of it (its own head and, for methods that
  add modules, those modules; the backbone tensors are shared, never copied).
- :mod:`~shpeft.serve.engine` runs requests: one worker per base batches same-task requests,
  writes the task's delta into the shared tensors, runs the batch and restores the base.
- :mod:`~shpeft.serve.decode` and :mod:`~shpeft.serve.upload` turn an upload into the model
  input through the training pipeline's own decoding, in memory, with limits.
- :mod:`~shpeft.serve.app` is the HTTP API and the page (FastAPI); :mod:`~shpeft.serve.cli`
  the ``shpeft serve`` command (uvicorn).

Importing this package is cheap: the web stack loads only with :mod:`~shpeft.serve.app`.
"""
