"""Wyoming front-end: speech to text and text to speech for Home Assistant's Assist."""
