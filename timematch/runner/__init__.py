"""The distributed experiment runner: the only part of the project that imports Ray and MLflow.

``launch.py`` hands the command line to :mod:`timematch.runner.cli`. The modules, in the
order a launch uses them:

- :mod:`~timematch.runner.scenarios`, :mod:`~timematch.runner.profiles`,
  :mod:`~timematch.runner.search_space`, :mod:`~timematch.runner.plan`: what to run,
  expanded from ``experiments/`` and ``search_spaces/`` and checked before Ray starts
  (no Ray or MLflow imports there);
- :mod:`~timematch.runner.resources`: the Ray connection and per-trial resources;
- :mod:`~timematch.runner.tracking`: the MLflow schema (experiment, parent and child runs);
- :mod:`~timematch.runner.launcher` and :mod:`~timematch.runner.stages`: one launch, its
  two Tune stages (source models, then adaptation trials);
- :mod:`~timematch.runner.search`: Optuna TPE and ASHA per (scenario, method, fold) group
  inside one Tuner;
- :mod:`~timematch.runner.trainables`: what a trial runs, in a Ray worker;
- :mod:`~timematch.runner.serving`: a trial's model as a self-contained MLflow pyfunc
  classifier of raw parcels;
- :mod:`~timematch.runner.progress`: terminal progress and run bookkeeping on the driver;
- :mod:`~timematch.runner.reporting`: the results table from MLflow.
"""
