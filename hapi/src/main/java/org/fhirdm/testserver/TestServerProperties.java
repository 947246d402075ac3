package org.fhirdm.testserver;

import ca.uhn.fhir.jpa.api.config.JpaStorageSettings.ClientIdStrategyEnum;
import java.util.ArrayList;
import java.util.List;
import org.springframework.boot.context.properties.ConfigurationProperties;

/**
 * Settings of the test server, bound from the {@code testserver.*} keys of
 * {@code application.yaml}. Each can be overridden on the command line, e.g.
 * {@code --testserver.default-page-size=50}.
 */
@ConfigurationProperties(prefix = "testserver")
public class TestServerProperties {

	/** Hibernate dialect class for the configured database. */
	private String hibernateDialect = "ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect";

	/**
	 * Milliseconds during which an identical search may be answered from the cached
	 * result of an earlier one. Zero or a negative value switches reuse off, so every
	 * search sees the current database state (what tests need).
	 */
	private long reuseCachedSearchResultsMillis = 0;

	/** Reject writes whose references point at resources that do not exist. */
	private boolean enforceReferentialIntegrityOnWrite = true;

	/** Reject deletes of resources that other resources still reference. */
	private boolean enforceReferentialIntegrityOnDelete = true;

	/** Create empty placeholder resources for dangling references (off: 4xx instead). */
	private boolean autoCreatePlaceholderReferenceTargets = false;

	/** Accept absolute references to other servers. */
	private boolean allowExternalReferences = false;

	/** Allow conditional deletes that match several resources. */
	private boolean allowMultipleDelete = false;

	/** Which client-assigned ids are accepted on PUT (ALPHANUMERIC, ANY, NOT_ALLOWED). */
	private ClientIdStrategyEnum clientIdStrategy = ClientIdStrategyEnum.ALPHANUMERIC;

	/** Page size of search results when the client gives no {@code _count}. */
	private int defaultPageSize = 20;

	/** Largest page size a client may ask for with {@code _count}. */
	private int maxPageSize = 500;

	/** Log one line per FHIR request (verb, URL, operation, time). */
	private boolean requestLogging = true;

	/**
	 * Browser origins allowed to call the server (CORS), as Spring origin patterns: the app
	 * and the CDS Hooks sandbox run in a browser on another origin. By default any loopback
	 * port; an empty list switches CORS off.
	 */
	private List<String> corsAllowedOrigins =
			new ArrayList<>(List.of("http://127.0.0.1:[*]", "http://localhost:[*]"));

	/**
	 * Index code-system concepts in an in-memory Lucene index (Hibernate Search), which
	 * HAPI's {@code CodeSystem/$subsumes} and {@code ValueSet/$expand} need. Off by default:
	 * only the terminology-server tests turn it on.
	 */
	private boolean terminologyIndex = false;

	/**
	 * FHIR R4 Subscriptions with rest-hook delivery ({@link SubscriptionServerConfig}). On by
	 * default, so that {@code fhir-dm subscriptions} against this server gives Subscriptions
	 * that HAPI activates and delivers; {@code --testserver.subscriptions=false} turns it off.
	 */
	private boolean subscriptions = true;

	/**
	 * Milliseconds between two runs of HAPI's job that hands stored resource changes to the
	 * subscription matcher (HAPI's default: 5000). Every rest-hook delivery waits for it, so
	 * it bounds the notification latency: 100, the shortest interval HAPI's scheduler accepts.
	 */
	private long subscriptionIntervalMs = 100;

	/**
	 * Resource types validated once in the background after start-up, so that the
	 * first client {@code $validate} does not pay the validator's start-up cost.
	 * Empty: no warm-up.
	 */
	private List<String> validationWarmupTypes = new ArrayList<>(List.of("Patient", "Observation", "Condition", "ServiceRequest"));

	/**
	 * Exit when standard input reaches end-of-file. Read directly from the environment
	 * by {@link StdinWatchdog}, which starts before the application context; kept here
	 * so that the key is declared with the others.
	 */
	private boolean exitOnStdinEof = false;

	public String getHibernateDialect() {
		return hibernateDialect;
	}

	public void setHibernateDialect(String hibernateDialect) {
		this.hibernateDialect = hibernateDialect;
	}

	public long getReuseCachedSearchResultsMillis() {
		return reuseCachedSearchResultsMillis;
	}

	public void setReuseCachedSearchResultsMillis(long reuseCachedSearchResultsMillis) {
		this.reuseCachedSearchResultsMillis = reuseCachedSearchResultsMillis;
	}

	public boolean isEnforceReferentialIntegrityOnWrite() {
		return enforceReferentialIntegrityOnWrite;
	}

	public void setEnforceReferentialIntegrityOnWrite(boolean enforceReferentialIntegrityOnWrite) {
		this.enforceReferentialIntegrityOnWrite = enforceReferentialIntegrityOnWrite;
	}

	public boolean isEnforceReferentialIntegrityOnDelete() {
		return enforceReferentialIntegrityOnDelete;
	}

	public void setEnforceReferentialIntegrityOnDelete(boolean enforceReferentialIntegrityOnDelete) {
		this.enforceReferentialIntegrityOnDelete = enforceReferentialIntegrityOnDelete;
	}

	public boolean isAutoCreatePlaceholderReferenceTargets() {
		return autoCreatePlaceholderReferenceTargets;
	}

	public void setAutoCreatePlaceholderReferenceTargets(boolean autoCreatePlaceholderReferenceTargets) {
		this.autoCreatePlaceholderReferenceTargets = autoCreatePlaceholderReferenceTargets;
	}

	public boolean isAllowExternalReferences() {
		return allowExternalReferences;
	}

	public void setAllowExternalReferences(boolean allowExternalReferences) {
		this.allowExternalReferences = allowExternalReferences;
	}

	public boolean isAllowMultipleDelete() {
		return allowMultipleDelete;
	}

	public void setAllowMultipleDelete(boolean allowMultipleDelete) {
		this.allowMultipleDelete = allowMultipleDelete;
	}

	public ClientIdStrategyEnum getClientIdStrategy() {
		return clientIdStrategy;
	}

	public void setClientIdStrategy(ClientIdStrategyEnum clientIdStrategy) {
		this.clientIdStrategy = clientIdStrategy;
	}

	public int getDefaultPageSize() {
		return defaultPageSize;
	}

	public void setDefaultPageSize(int defaultPageSize) {
		this.defaultPageSize = defaultPageSize;
	}

	public int getMaxPageSize() {
		return maxPageSize;
	}

	public void setMaxPageSize(int maxPageSize) {
		this.maxPageSize = maxPageSize;
	}

	public boolean isRequestLogging() {
		return requestLogging;
	}

	public void setRequestLogging(boolean requestLogging) {
		this.requestLogging = requestLogging;
	}

	public boolean isTerminologyIndex() {
		return terminologyIndex;
	}

	public void setTerminologyIndex(boolean terminologyIndex) {
		this.terminologyIndex = terminologyIndex;
	}

	public boolean isSubscriptions() {
		return subscriptions;
	}

	public void setSubscriptions(boolean subscriptions) {
		this.subscriptions = subscriptions;
	}

	public long getSubscriptionIntervalMs() {
		return subscriptionIntervalMs;
	}

	public void setSubscriptionIntervalMs(long subscriptionIntervalMs) {
		this.subscriptionIntervalMs = subscriptionIntervalMs;
	}

	public List<String> getCorsAllowedOrigins() {
		return corsAllowedOrigins;
	}

	public void setCorsAllowedOrigins(List<String> corsAllowedOrigins) {
		this.corsAllowedOrigins = corsAllowedOrigins;
	}

	public List<String> getValidationWarmupTypes() {
		return validationWarmupTypes;
	}

	public void setValidationWarmupTypes(List<String> validationWarmupTypes) {
		this.validationWarmupTypes = validationWarmupTypes;
	}

	public boolean isExitOnStdinEof() {
		return exitOnStdinEof;
	}

	public void setExitOnStdinEof(boolean exitOnStdinEof) {
		this.exitOnStdinEof = exitOnStdinEof;
	}
}
