"""One module per wizard step; `base.StepScreen` holds what they share."""
