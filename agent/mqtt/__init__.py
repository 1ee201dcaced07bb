"""MQTT front-end: events out, commands in, availability, outbox, Home Assistant discovery."""
