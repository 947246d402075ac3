package org.fhirdm.testserver;

import java.io.IOException;
import java.io.InputStream;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.context.event.ApplicationEnvironmentPreparedEvent;
import org.springframework.context.ApplicationListener;

/**
 * Ends the server when its standard input reaches end-of-file, if
 * {@code testserver.exit-on-stdin-eof=true}.
 *
 * <p>A test harness starts the server with a pipe as its standard input and never
 * writes to it. When the harness exits, however it exits (even killed outright), the
 * pipe closes and the server shuts down instead of living on as an orphan. Off by
 * default: a server started by hand or in the background keeps running.
 */
public class StdinWatchdog implements ApplicationListener<ApplicationEnvironmentPreparedEvent> {

	public static final String PROPERTY = "testserver.exit-on-stdin-eof";

	private static final Logger LOG = LoggerFactory.getLogger(StdinWatchdog.class);

	@Override
	public void onApplicationEvent(ApplicationEnvironmentPreparedEvent event) {
		if (!event.getEnvironment().getProperty(PROPERTY, Boolean.class, false)) {
			return;
		}
		Thread watcher = new Thread(StdinWatchdog::waitForEof, "stdin-watchdog");
		watcher.setDaemon(true);
		watcher.start();
	}

	private static void waitForEof() {
		byte[] buffer = new byte[256];
		try (InputStream in = System.in) {
			while (in.read(buffer) >= 0) {
				// Input is ignored; only its end matters.
			}
		} catch (IOException e) {
			LOG.warn("Reading standard input failed: {}", e.toString());
		}
		LOG.info("Standard input closed (the process that started this server is gone): shutting down");
		System.exit(0);
	}
}
