"""A training run's arguments after validation: read-only.

``RunArgs`` wraps the validated ``argparse`` namespace, which nothing writes afterwards, together with
the values the run derives from it later (``derive``): the step count from ``--max_train_epochs`` and the
dataset size, ``--save_every_n_epochs`` from ``--save_n_epoch_ratio``, Adafactor's relative-step
learning-rate settings. Readers see one namespace (attributes, ``getattr``, ``vars``) with kohya's
values, where kohya assigns them to ``args``; an assignment raises, so a stage cannot change an argument
behind the others' backs.
"""


class RunArgs:
    __slots__ = ("_args", "_derived")

    def __init__(self, args):
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_derived", {})

    def __getattr__(self, name):  # called for the names that are not slots
        derived = object.__getattribute__(self, "_derived")
        if name in derived:
            return derived[name]
        return getattr(object.__getattribute__(self, "_args"), name)

    def __setattr__(self, name, value):
        raise AttributeError(f"the arguments are read-only once validated: '{name}' is derived with "
                             "RunArgs.derive, which says where the value comes from")

    @property
    def __dict__(self):  # vars(run_args): the arguments with the derived values
        return {**vars(self._args), **self._derived}

    def derive(self, **values):
        """Values computed from the arguments (kohya writes them into ``args``); each name must be an argument."""
        for name in values:
            if not hasattr(self._args, name):
                raise AttributeError(f"'{name}' is not an argument")
        self._derived.update(values)

    @property
    def derived(self):
        return dict(self._derived)
