"""Quality control: DVARS, tSNR/SNR/spikes, carpet, usable frames, alerts, verdict."""
