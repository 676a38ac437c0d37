"""Diffusion process: β schedules and diffusers schedulers (:mod:`.schedules`), the ε-prediction
loss (:mod:`.losses`) and generic DDIM / DDPM samplers (:mod:`.samplers`)."""
