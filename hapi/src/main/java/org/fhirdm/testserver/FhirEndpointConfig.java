package org.fhirdm.testserver;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.ValueSetOperationProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.CorsInterceptor;
import ca.uhn.fhir.rest.server.interceptor.LoggingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import java.util.List;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.web.cors.CorsConfiguration;

/**
 * The FHIR REST endpoint: one HAPI {@link RestfulServer} mounted at {@code /fhir/*}.
 *
 * <p>It serves, for every R4 resource type, read/vread/create/update/patch/delete,
 * search (with paging kept in the database), history and {@code $validate}; at the
 * server root, transaction/batch bundles and history; plus {@code /metadata} and the
 * ValueSet operations ({@code $expand}, {@code $validate-code}).
 */
@Configuration
public class FhirEndpointConfig {

	public static final String FHIR_PATH = "/fhir/*";

	@Bean
	public RestfulServer fhirRestfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			ValueSetOperationProvider valueSetOperationProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			TestServerProperties props) {
		// Narratives are not generated: stored resources come back as they were sent.
		fhirContext.setNarrativeGenerator(new NullNarrativeGenerator());

		RestfulServer server = new RestfulServer(fhirContext);
		server.setServerName("fhir-dm test server (HAPI FHIR JPA)");
		server.setImplementationDescription("fhir-dm local FHIR R4 test server");
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setDefaultPrettyPrint(false);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());

		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(valueSetOperationProvider);

		JpaCapabilityStatementProvider capabilityStatement = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilityStatement.setImplementationDescription("fhir-dm local FHIR R4 test server");
		server.setServerConformanceProvider(capabilityStatement);

		pagingProvider.setDefaultPageSize(props.getDefaultPageSize());
		pagingProvider.setMaximumPageSize(props.getMaxPageSize());
		server.setPagingProvider(pagingProvider);

		if (props.isRequestLogging()) {
			LoggingInterceptor requestLog = new LoggingInterceptor();
			requestLog.setLoggerName("fhir.request");
			requestLog.setMessageFormat(
					"${requestVerb} ${requestUrl}${requestParameters} -> ${operationType} "
							+ "${idOrResourceName} (${processingTimeMillis} ms)");
			requestLog.setErrorMessageFormat(
					"ERROR ${requestVerb} ${requestUrl}${requestParameters} -> ${operationType}: "
							+ "${exceptionMessage} (${processingTimeMillis} ms)");
			requestLog.setLogExceptions(true);
			server.registerInterceptor(requestLog);
		}
		if (!props.getCorsAllowedOrigins().isEmpty()) {
			// Browser clients (the app's SMART client, the CDS Hooks sandbox) on other origins.
			CorsConfiguration cors = new CorsConfiguration();
			cors.setAllowedOriginPatterns(props.getCorsAllowedOrigins());
			cors.setAllowedMethods(List.of("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"));
			cors.setAllowedHeaders(List.of(
					"Authorization", "Content-Type", "Accept", "Prefer", "If-Match",
					"If-None-Exist", "X-Request-ID"));
			cors.setExposedHeaders(List.of("Location", "Content-Location", "ETag"));
			cors.setAllowCredentials(false);
			server.registerInterceptor(new CorsInterceptor(cors));
		}
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServletRegistration(RestfulServer fhirRestfulServer) {
		ServletRegistrationBean<RestfulServer> registration =
				new ServletRegistrationBean<>(fhirRestfulServer, FHIR_PATH);
		registration.setName("fhirServlet");
		// Initialise HAPI's servlet at start-up, so the first request is not the slow one.
		registration.setLoadOnStartup(1);
		return registration;
	}
}
