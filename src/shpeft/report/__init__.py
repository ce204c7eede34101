"""A self-contained HTML report for every run, and an index page for a benchmark grid.

- :mod:`shpeft.report.build`: ``report.html`` of one run from what it recorded (training log,
  metrics, test predictions, selection, config, cost) plus explanation heat maps; the hook the
  training loop calls at the end of a run;
- :mod:`shpeft.report.rebuild`: ``shpeft report RUN`` for any run, old ones included (their test
  predictions are recomputed from the run's own recorded test split);
- :mod:`shpeft.report.predictions`: the run's ``test_predictions.npz``;
- :mod:`shpeft.report.calibration`: reliability bins and expected calibration error;
- :mod:`shpeft.report.figures`: the matplotlib figures, as PNG bytes;
- :mod:`shpeft.report.examples`: which test images to show, and their explanation overlays
  (also ``shpeft predict --explain``);
- :mod:`shpeft.report.html`: escaping, data URIs, tables and the page shell;
- :mod:`shpeft.report.index`: ``index.html`` of ``shpeft bench`` (Table 1 linking to the runs'
  reports, Fig. 4).

Nothing here is imported by ``shpeft`` at start-up. The report sits above the run directory
(:mod:`shpeft.runs`) and below the training loop, which calls :mod:`~shpeft.report.build` at
the end of every run; nothing here imports :mod:`shpeft.training`.
"""
