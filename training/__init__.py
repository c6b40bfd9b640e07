"""Training and evaluation loops behind ``train.py`` and ``evaluate.py``.

Read in this order:

* ``config.py``     the flags (NVIDIA's names), the two recipes, and ``TrainConfig``: every setting of a run,
                    filled once from the parsed flags;
* ``recipe.py``     the small-data recipe's input size, batch, learning rate and epochs, fitted to the data;
* ``loop.py``       ``train(args)``: setup -> ``train_one_epoch`` -> ``train_step``, checkpoints and resume;
* ``schedule.py``   optimizer and per-step learning-rate schedule;
* ``budget.py``     ``--time-budget``: when training stops so that the final evaluation ends in time;
* ``evaluation.py`` inference over a loader and COCO (or Waymo) scoring, shared by both scripts;
* ``models.py``     the one place a model is built: from flags, or from a checkpoint;
* ``runlog.py``     console, the JSON log and result tables;
* ``distributed.py`` process groups (torchrun, SLURM, ``--nproc``);
* ``host.py``       loader workers per CPU core, and the C allocator setting for CPU runs;
* ``errors.py``     bad input -> one ``error: <what> (<file>, <field>): <todo>`` line and exit status 2;
* ``images.py``     ``evaluate.py --images``: the detector on a folder of images without annotations;
* ``plots.py``      ``curves.png`` of a run's log and the detection pictures.

``detector/`` (the model) and ``datasets/`` (the data) know nothing about this package.
"""
