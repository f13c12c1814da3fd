plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.minicpmvedge.app"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.minicpmvedge.app"
        // API 23 is what the offline APK build here compiles against (android.jar from Debian), and
        // executorch-android's own minSdk.
        minSdk = 23
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            // executorch-android ships arm64-v8a and x86_64 native libraries.
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = true
            proguardFiles(getDefaultProguardFile("proguard-android-optimize.txt"), "proguard-rules.pro")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_11
        targetCompatibility = JavaVersion.VERSION_11
    }

    packaging {
        jniLibs {
            // .pte programs are mmapped by the runtime; keep the native libraries uncompressed too.
            useLegacyPackaging = false
        }
    }
}

kotlin {
    compilerOptions {
        jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_11)
    }
}

dependencies {
    implementation(project(":core"))
    // ExecuTorch's Android library (LlmModule: the stock LLM / multimodal runner over JNI), from
    // Maven Central. 1.5.1 matches the executorch Python package that exports the bundles.
    implementation("org.pytorch:executorch-android:1.5.1")
}
