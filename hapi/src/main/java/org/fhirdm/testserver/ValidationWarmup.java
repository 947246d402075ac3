package org.fhirdm.testserver;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.IInstanceValidatorModule;
import java.util.List;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Qualifier;
import org.springframework.boot.context.event.ApplicationReadyEvent;
import org.springframework.context.ApplicationListener;
import org.springframework.stereotype.Component;

/**
 * Warms up the instance validator once the server is ready.
 *
 * <p>The first {@code $validate} after a start loads the FHIR core definitions into
 * the validator and costs several seconds; later calls take milliseconds. This runs
 * that first validation on a background thread right after start-up, for the
 * resource types in {@code testserver.validation-warmup-types}, so that a client's
 * first {@code $validate} is not the slow one. The server answers requests while it
 * runs; an empty list switches it off.
 */
@Component
public class ValidationWarmup implements ApplicationListener<ApplicationReadyEvent> {

	private static final Logger LOG = LoggerFactory.getLogger(ValidationWarmup.class);

	private final FhirContext fhirContext;
	private final IInstanceValidatorModule instanceValidator;
	private final List<String> resourceTypes;

	public ValidationWarmup(
			FhirContext fhirContext,
			@Qualifier("myInstanceValidator") IInstanceValidatorModule instanceValidator,
			TestServerProperties props) {
		this.fhirContext = fhirContext;
		this.instanceValidator = instanceValidator;
		this.resourceTypes = props.getValidationWarmupTypes();
	}

	@Override
	public void onApplicationEvent(ApplicationReadyEvent event) {
		if (resourceTypes == null || resourceTypes.isEmpty()) {
			return;
		}
		Thread worker = new Thread(this::warmUp, "validation-warmup");
		worker.setDaemon(true);
		worker.setPriority(Thread.MIN_PRIORITY);
		worker.start();
	}

	private void warmUp() {
		long start = System.currentTimeMillis();
		FhirValidator validator = fhirContext.newValidator();
		validator.registerValidatorModule(instanceValidator);
		// A coded element with a required binding also loads the terminology side.
		validator.validateWithResult("{\"resourceType\":\"Patient\",\"gender\":\"unknown\"}");
		for (String type : resourceTypes) {
			try {
				validator.validateWithResult("{\"resourceType\":\"" + type.trim() + "\"}");
			} catch (RuntimeException e) {
				LOG.warn("Validation warm-up for {} failed: {}", type, e.toString());
			}
		}
		LOG.info("Validator warmed up for {} in {} ms", resourceTypes, System.currentTimeMillis() - start);
	}
}
