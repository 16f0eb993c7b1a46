"""The adaptive search: TPE trials over calibration data x metric x allocation x repair (driver), and the
trial table the app and the CLI show (trial_rows)."""
