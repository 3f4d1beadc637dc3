"""The one shared training stack: every model plugs a Task into `training.train.run`."""
