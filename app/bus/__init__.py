"""The bus: NATS core and JetStream, the embedded server, subjects, codecs and tracing."""
