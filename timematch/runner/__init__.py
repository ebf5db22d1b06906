"""The distributed experiment runner: the only part of the project that imports Ray and MLflow.

``launch.py`` hands the command line to :mod:`timematch.runner.cli`. The modules, in the
order a launch uses them (``ARCHITECTURE.md`` has the map and the owner of each concept):

- :mod:`~timematch.runner.scenarios`, :mod:`~timematch.runner.profiles`,
  :mod:`~timematch.runner.search_space`, :mod:`~timematch.runner.plan`: what to run,
  expanded from ``experiments/`` and ``search_spaces/`` and checked before Ray starts
  (no Ray or MLflow imports there);
- :mod:`~timematch.runner.launch_state`: a launch's folder (``results/<experiment>/``) and
  the resolved launch;
- :mod:`~timematch.runner.resources`, :mod:`~timematch.runner.gpu_share`: the Ray
  connection and per-trial resources;
- :mod:`~timematch.runner.tracking` (the MLflow store, its checks and credentials),
  :mod:`~timematch.runner.waiting` (retries and a server that does not answer),
  :mod:`~timematch.runner.run_names` (names, tags, the keys that find a run) and
  :mod:`~timematch.runner.runs` (a run's life: the only code that sets a run's status);
- :mod:`~timematch.runner.launcher` and :mod:`~timematch.runner.stages`: one launch, its
  two Tune stages (trainings on a source tile, then adaptation trials);
- :mod:`~timematch.runner.search`, :mod:`~timematch.runner.trial_config`: Optuna TPE and
  ASHA per (scenario, method, fold) group inside one Tuner, and the typed trial configs;
- :mod:`~timematch.runner.trainables`: what a trial runs, in a Ray worker;
- :mod:`~timematch.runner.serving`: a trial's model as a self-contained MLflow pyfunc
  classifier of raw parcels;
- :mod:`~timematch.runner.progress`: terminal progress and run bookkeeping on the driver;
- :mod:`~timematch.runner.reporting`: the results table from MLflow;
- :mod:`~timematch.runner.accounts`: MLflow server accounts (the cluster's logins).
"""
