"""nnU-Net v2, unmodified, driven from our code: training on partial label maps.

One module per stage, as in nnU-Net itself:

- :mod:`.profiles`      training budgets and network overrides (``paper``, ``cpu-small``, ``test``)
- :mod:`.paths`         where nnU-Net's files of a project live, and the environment a worker needs
- :mod:`.fingerprint`   dataset fingerprint that does not count ignore voxels as foreground
- :mod:`.planning`      nnU-Net's ExperimentPlanner on the project (plans made once, kept for later loops)
- :mod:`.preprocessing` nnU-Net's DefaultPreprocessor, re-run only for cases whose labels changed
- :mod:`.splits`        class-aware k-fold splits over the images that have annotated boxes
- :mod:`.sampling`      the region-sampling data loader (docs/METHODS.md section 2)
- :mod:`.prepare`       plan (once) + preprocess (changed cases) + splits: the step before the folds
- :mod:`.trainer`       ``nnUNetTrainerPartial`` and :func:`~.trainer.train_fold`
- :mod:`.determinism`   fold seeds, random states in checkpoints: seeded CPU training is reproducible
- ``python -m ActiveLearning3DLib.nnunet {env,prepare,train}``: one step by hand, run as a job in that process
  (progress in the job folder's ``status.json``, the result in its ``result.json``)

Only planning needs nnU-Net's environment variables; it must run in a child
process started with ``env={**os.environ, **nnunet_environment(project)}``
(see :mod:`.paths` for what nnU-Net 2.8.1 reads from the environment, and where).

Importing this package is cheap: torch and nnU-Net are imported only by the
modules that need them, so a GUI process can read profiles and paths without them.
"""

from __future__ import annotations
