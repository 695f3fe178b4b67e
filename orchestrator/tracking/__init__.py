"""A run's MLflow record: the parent run, its children and step metrics (:mod:`.tracker`), the durable outbox that
lets a run go on while the tracking server is away (:mod:`.outbox`), and the watchdog process that marks a run
whose driver died (:mod:`.watchdog`)."""
