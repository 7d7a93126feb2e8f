"""Budget units, FLOP accounting and the `kdfast bench budget` calibration suite."""
