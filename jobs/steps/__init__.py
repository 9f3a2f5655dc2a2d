"""The nightly steps and the evaluation: each a typed function of the settings and a logical date."""
