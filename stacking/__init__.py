"""The stack: meta-learners over the base learners' out-of-fold predictions (`meta`), the Optuna candidate study
with nested CV (`stack`) and the HTML report (`report`)."""
