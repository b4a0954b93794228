"""Model zoo: UNet configs, noise schedules, sampler step modules, loaders."""
